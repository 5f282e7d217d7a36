from disagg_cli.cli import main

main()
