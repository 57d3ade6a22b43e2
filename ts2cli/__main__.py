from ts2cli.cli import main

main()
