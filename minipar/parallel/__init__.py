"""Parallel strategies, one folder each: data, tensor, pipeline, zero, context, expert."""
