"""Every file the package reads or writes: atomic files, our checkpoint and its upgrades, the official checkpoint."""
