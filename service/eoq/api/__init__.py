"""The gRPC API: servicer, protobuf adapters, auth, error mapping, server assembly."""
