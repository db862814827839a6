"""Everything that talks to (or stands in for) the Apitally hub, off the hot path."""
