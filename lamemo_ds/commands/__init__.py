"""The subcommands of the `lamemo` CLI, one module each with `add_arguments(parser)` and
`run(args)` (tools/ runs some of them as standalone programs)."""
