from impasto.cli import main

main()
