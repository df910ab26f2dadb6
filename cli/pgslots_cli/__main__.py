from pgslots_cli.main import main

main()
