"""One module per outside checkpoint format, mapped onto this library's model families by name tables."""
