"""hexin serve: the HTTP and WebSocket server."""
