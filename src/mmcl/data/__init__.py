"""Task data: manifests, streams, records, validation, batching and the built-in synthetic world."""
