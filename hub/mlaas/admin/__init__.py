"""Live administration of profiles and quotas: an editor over the profile source with history,
served by a JupyterHub service (page + REST API) that only hub admins may use."""
