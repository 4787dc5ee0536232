"""fp16 / int8 update compression: the wire format, the client's encoder, the server's decoder."""
