# dask-gateway-server configuration of MLaaS Hub, started by JupyterHub as the service
# "dask-gateway"; everything is built from the platform settings by mlaas.dask_gateway.
from mlaas.dask_gateway import configure
from mlaas.settings import load_settings

configure(c, load_settings())  # noqa: F821 - `c` is provided by dask-gateway-server
