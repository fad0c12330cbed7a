"""Reading run directories: plots, reports and the run listing (an edge: it reads files, nothing in training
imports it)."""
