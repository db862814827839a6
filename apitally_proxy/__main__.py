from apitally_proxy.cli import main

raise SystemExit(main())
