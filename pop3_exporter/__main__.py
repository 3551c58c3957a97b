from pop3_exporter.cli import main

raise SystemExit(main())
