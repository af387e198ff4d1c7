"""HTTP routes: one module per protocol; each parses the request, calls the data plane, shapes the reply."""
