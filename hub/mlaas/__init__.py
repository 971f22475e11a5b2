"""MLaaS Hub: a multi-tenant JupyterHub ML-as-a-Service platform for research labs."""
