"""The router: public APIs (OpenAI-compatible HTTP with SSE, gRPC `dspark.v1.Router`), sessions
(Redis or an embedded store), replica registry and placement, draft-length control, admission."""
