"""sage command-line interface: parses options, calls the library, renders with Rich."""
