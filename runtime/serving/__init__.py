"""The gRPC face of the server: it knows protos, not torch, and never touches a stream."""
