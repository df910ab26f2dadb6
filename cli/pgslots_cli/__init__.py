"""The ``pgslots`` command line: parses, calls the library, prints. No SQL and no slot logic here."""
