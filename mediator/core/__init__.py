"""Protocol-free core: envelope helpers, formats, routing, seams. Imports no network or storage library."""
