"""The admin socket: QMP-shaped JSON lines, a command table, and jobs."""
