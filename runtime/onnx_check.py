"""A bundle's .onnx files checked as bytes, before any onnxruntime session exists for them:
a protobuf message whose tensors all keep their data inside the file (onnxruntime would read
external data by path, and a bundle must be self-contained). No onnx package needed."""

from __future__ import annotations

from .catalog_index import BundleError

# ONNX protobuf field numbers (onnx.proto) on every path that can lead to a tensor.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
_FUNCTION_NODES = 7
_NODE_ATTRIBUTES = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_MAX_GRAPH_DEPTH = 64


class _ProtoError(ValueError):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _ProtoError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, wire type, value) of one protobuf message; values of wire type 2 are
    memoryviews into data, nothing is copied or interpreted beyond that."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        if pos > len(data) or field == 0:
            raise _ProtoError("truncated message")
        yield field, wire, value


def _external_tensor(data: memoryview, kind: str, depth: int = 0) -> str | None:
    """The name of the first tensor stored outside the file, walking every graph, node
    attribute, subgraph and function of an ONNX message of the given kind; else None."""
    if depth > _MAX_GRAPH_DEPTH:
        raise _ProtoError(f"graphs nested more than {_MAX_GRAPH_DEPTH} deep")
    children = {
        "model": {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"},
        "graph": {_GRAPH_NODES: "node", _GRAPH_INITIALIZERS: "tensor",
                  _GRAPH_SPARSE_INITIALIZERS: "sparse"},
        "function": {_FUNCTION_NODES: "node"},
        "node": {_NODE_ATTRIBUTES: "attribute"},
        "attribute": {_ATTR_TENSOR: "tensor", _ATTR_TENSORS: "tensor", _ATTR_GRAPH: "graph",
                      _ATTR_GRAPHS: "graph", _ATTR_SPARSE_TENSOR: "sparse",
                      _ATTR_SPARSE_TENSORS: "sparse"},
        "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
        "tensor": {},
    }[kind]
    name, external = "?", False
    for field, wire, value in _fields(data):
        if kind == "tensor":
            if field == _TENSOR_NAME and wire == 2:
                name = bytes(value).decode("utf-8", "replace")
            elif field == _TENSOR_EXTERNAL_DATA or (
                    field == _TENSOR_DATA_LOCATION and wire == 0 and value != 0):
                external = True
        elif field in children and wire == 2:
            found = _external_tensor(value, children[field], depth + 1)
            if found is not None:
                return found
    return name if external else None



def check_onnx(name: str, data: bytes) -> None:
    """Refuse the bytes of graph file `name` when they are not a protobuf message or keep
    tensor data in other files."""
    try:
        found = _external_tensor(memoryview(data), "model")
    except _ProtoError as exc:
        raise BundleError(f"{name}: not a valid ONNX model ({exc})") from None
    if found is not None:
        raise BundleError(
            f"{name}: tensor {found!r} keeps its data in an external file; "
            "bundle graphs must be self-contained"
        )
