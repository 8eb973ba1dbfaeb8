"""The chaos proof of orderbus: crashes, broker restarts and downstream faults while orders flow (see `chaos.run`)."""
