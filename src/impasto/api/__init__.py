"""HTTP and WebSocket transports: parse, call the dispatcher, serialize. No business logic."""
