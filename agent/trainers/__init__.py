"""Where runs train: `base` says what a trainer is; `local` trains on this machine, `ray` as Ray tasks."""
