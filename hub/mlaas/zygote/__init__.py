"""The pre-started server process ("zygote") that local servers fork from.

A JupyterLab server spends about 2 s of CPU importing jupyter_server, JupyterLab and their
extensions before it can answer, and that work is the same for every user. The zygote does it
once: a process started by the hub with a clean environment (no secret of the hub's, no user's
anything) imports the server and its extensions and waits. For each server the hub asks it to
fork; the child becomes the user's server (mlaas.server_entry: session, cgroups, CPU set, GPU
fence, umask, groups, account, home), replaces its environment and runs `jupyterhub-singleuser`'s
own `main()`; it is ready in about a tenth of a second, and the imported code stays shared
between servers (copy-on-write).

What keeps the servers apart:
- the zygote never reads a request: it takes one byte ("spawn") and forks, and only the child
  reads what the hub sends (the user's environment, token, account). So no user's data ever
  enters the memory the next user's server is forked from;
- the zygote holds no secret: the hub starts it with a fixed, minimal environment (`zygote_env`)
  by exec, so none of the hub's memory, environment or file descriptors reach it;
- the child closes every descriptor but its own socket to the hub before it reads, and that one
  before it runs the server; signal handlers are reset; it starts a new session;
- only the hub's account may connect (a socket in a directory only it can enter, and the
  zygote checks the peer's credentials).
Where the zygote cannot serve a start (it is still importing, it died, the profile sets an
interpreter variable such as PYTHONPATH, or a different command), the server is started by exec
as before, and the hub log says why.
"""
