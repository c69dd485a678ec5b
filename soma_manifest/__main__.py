from soma_manifest.cli import main

main()
