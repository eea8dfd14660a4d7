"""Run commands: train, eval, predict, demo (filled in with the trainer)."""


def add_commands(sub, add_run_args):
    pass
