from .runtime.lifeline import die_with_launcher

die_with_launcher()  # A worker of `--gpus N` dies with its launcher; before any import that takes time.

from .cli.app import main  # noqa: E402

main()
