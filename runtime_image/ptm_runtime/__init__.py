"""ptm runtime: what runs in pods — the converter (`ptm convert`) and the server (`ptm serve`)."""
