from labkit.models import main

raise SystemExit(main())
