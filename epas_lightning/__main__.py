from epas_lightning.cli import main

main()
