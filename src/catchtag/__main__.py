from catchtag.cli import main

main()
