# Generated code lives here: `make protos` writes mesh_pb2*.py from protos/mesh/v1/mesh.proto.
# Never edit these files by hand.
