from ts2cli.launch import main

main()
