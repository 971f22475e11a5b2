# JupyterHub configuration of MLaaS Hub: everything is built from the platform settings
# (mlaas.yaml / MLAAS_* variables) by mlaas.hubconfig. Start it with `make up` or `mlaas up`.
from mlaas.hubconfig import configure
from mlaas.settings import load_settings

configure(c, load_settings())  # noqa: F821 - `c` is provided by JupyterHub
