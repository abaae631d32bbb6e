"""One module per `icu-peft` subcommand: `add_parser(subparsers)` and `run(args) -> int`."""
