"""GAIA: APUS consensus for unmodified servers, TRIPOD cluster management, and VM sync."""
