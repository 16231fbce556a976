"""The policy service: validates policy documents and stores good ones with a version."""
