"""Experiment tracking per group: an MLflow server behind the hub, with the hub's identities.

- `service` (`python -m mlaas.tracking`): a hub-managed service at /services/mlflow/. It starts
  the MLflow server (its own virtual environment, its own port on 127.0.0.1, basic-auth app with
  workspaces) as its child, and forwards every request to it as the MLflow user of the same
  name, after the hub has said who is asking: a browser through the hub's OAuth, a notebook or
  script with its hub token (`MLFLOW_TRACKING_TOKEN`, which the `mlflow` client sends).
- `sync`: the hub's groups become MLflow's own permission model: one MLflow workspace per hub
  group, in it one role ("members", USE on the workspace, EDIT on its experiments and models),
  and each user holds the roles of exactly the groups the hub says they are in (checked again
  on every request once the hub's answer is 10 s old). Hub admins are MLflow admins. MLflow then
  decides every request itself: another group's experiments are neither listed nor readable.
- `mlflow_api`: the few REST calls of MLflow's auth and workspace APIs the sync needs.
- `server`: the MLflow server's command line, configuration and state directories.
"""
