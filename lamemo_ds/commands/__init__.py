"""The subcommands of the `lamemo` CLI, one module each with `add_arguments(parser)` and
`run(args)` (tools/ runs some of them as standalone programs).

Rule: a command parses, calls into the package and turns errors into one line and an exit code
(config.errors.EXIT_USER_ERROR for a user error); the work lives below. Hence the shared names:
commands/prepare.py, convert.py, inspect.py and verify.py are the CLI front-ends of the same
concept in data/prepare.py and convert/convert.py, inspect.py, verify.py, not second copies.
"""
