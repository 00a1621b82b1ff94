"""Job entry points and the `vidray` command line. Library code never imports this package."""
