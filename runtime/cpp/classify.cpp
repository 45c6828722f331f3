// classify: multi-scale dense evaluation of a vgg-onnx model with OpenCV alone (docs/protocol.md §3, §5).
//
//   classify MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip] [--max-pixels 100000000]
//
// Prints a JSON array in the schema of `vgg-onnx infer --format json`. OpenCV decodes and
// rescales the image and runs the same .onnx file Python runs (cv::dnn::readNetFromONNX).
// OpenCV 4.6's importer runs this graph one image at a time, for any H and W, so the image and
// its mirror are two runs. The model's metadata (classes, test scales) is read from the .onnx
// file's metadata_props (one JSON document, key "vgg_onnx"), or from the same document in the
// JSON file export writes beside it, and validated once at
// load. Images are decoded by the rules of docs/decoding.md, as `vgg-onnx infer` does.
// An int8 model (`vgg-onnx quantize`) is refused in one line: OpenCV 4.6 cannot import its graph.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/dnn.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

using json = nlohmann::ordered_json;

namespace {

const char* USAGE = "usage: classify MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip] [--max-pixels 100000000]";
const int TOP_K = 5;
const int64_t DEFAULT_MAX_PIXELS = 100000000;  // as vgg-onnx infer: docs/decoding.md

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ---- files ---------------------------------------------------------------------------------

const uint64_t MAX_IMAGE_BYTES = uint64_t(1) << 30;  // docs/decoding.md: no image file is larger
const uint64_t MAX_MODEL_BYTES = uint64_t(2) << 30;  // protobuf's own limit for one .onnx file

struct FileDescriptor {  // closes on every path out, exceptions included
    int fd;
    ~FileDescriptor() { if (fd >= 0) ::close(fd); }
};

// Opens without blocking (a FIFO would wait for a writer forever) and accepts regular files only,
// of at most max_bytes; returns the descriptor and sets size.
int open_regular_file(const std::string& path, uint64_t max_bytes, uint64_t& size) {
    int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("cannot read: " + std::string(std::strerror(errno)));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw std::runtime_error("cannot read: not a regular file");
    }
    size = uint64_t(st.st_size);
    if (size > max_bytes) {
        ::close(fd);
        throw std::runtime_error("file of " + std::to_string(size) + " bytes exceeds the size limit of " +
                                 std::to_string(max_bytes) + " bytes");
    }
    return fd;
}

// The file's bytes as its size said when opened (a file that grows meanwhile is cut there).
std::vector<uint8_t> read_regular_file(const std::string& path, uint64_t max_bytes) {
    uint64_t size = 0;
    FileDescriptor file{open_regular_file(path, max_bytes, size)};
    std::vector<uint8_t> data(size);
    size_t done = 0;
    while (done < size) {
        ssize_t got = ::read(file.fd, data.data() + done, size - done);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) throw std::runtime_error("cannot read: " + std::string(std::strerror(errno)));
        if (got == 0) break;
        done += size_t(got);
    }
    data.resize(done);
    return data;
}

// ---- a bounded protobuf walk ---------------------------------------------------------------

// An .onnx file is a protobuf ModelProto. Forged or truncated files declare any length: every
// length is checked against the bytes that remain before anything is skipped or allocated.
struct ProtoField {
    int number, wire_type;
    uint64_t value;        // wire type 0
    std::streamoff start;  // wire type 2: the payload's offset
    uint64_t length;       // wire type 2: its length
};

bool read_varint(std::istream& in, uint64_t& value, std::streamoff remaining) {
    value = 0;
    for (int shift = 0; shift < 64 && remaining-- > 0; shift += 7) {
        int byte = in.get();
        if (byte == EOF) return false;
        value |= uint64_t(byte & 0x7f) << shift;
        if (!(byte & 0x80)) return true;
    }
    return false;
}

// Calls visit for each field of the message in [begin, end); false if it is not well formed.
bool walk_message(std::istream& in, std::streamoff begin, std::streamoff end,
                  const std::function<void(const ProtoField&)>& visit) {
    for (std::streamoff pos = begin; pos < end;) {
        in.clear();
        in.seekg(pos);
        uint64_t tag = 0;
        if (!read_varint(in, tag, end - pos) || (tag >> 3) == 0 || (tag >> 3) > (1u << 29)) return false;
        ProtoField field{int(tag >> 3), int(tag & 7), 0, 0, 0};
        std::streamoff here = in.tellg();
        if (field.wire_type == 0 && !read_varint(in, field.value, end - here)) return false;
        if (field.wire_type == 1 || field.wire_type == 5) field.length = field.wire_type == 1 ? 8 : 4;
        if (field.wire_type == 2 && !read_varint(in, field.length, end - here)) return false;
        if (field.wire_type != 0 && field.wire_type != 1 && field.wire_type != 2 && field.wire_type != 5) return false;
        field.start = in.tellg();
        if (field.start < 0 || field.length > uint64_t(end - field.start)) return false;
        visit(field);
        pos = field.start + std::streamoff(field.length);
    }
    return true;
}

// A length-delimited payload, bounded by the walk above to bytes the file really has.
std::string read_payload(std::istream& in, const ProtoField& field) {
    std::string payload(size_t(field.length), '\0');
    in.clear();
    in.seekg(field.start);
    in.read(payload.data(), std::streamsize(field.length));
    if (!in) throw std::runtime_error("truncated protobuf field");
    return payload;
}

// Walks a small message held in memory.
bool walk_payload(const std::string& payload, const std::function<void(std::istream&, const ProtoField&)>& visit) {
    std::istringstream in(payload);
    return walk_message(in, 0, std::streamoff(payload.size()), [&](const ProtoField& f) { visit(in, f); });
}

// metadata_props (field 14) entries {1: key, 2: value}; the graph (field 7) output "probs"
// (GraphProto.output 12: ValueInfoProto {1 name, 2 type {1 tensor {2 shape {1 dim {1 value}}}}}):
// its second dimension is the number of classes the graph gives. The graph's other fields
// (the weights) are skipped, not read.
struct OnnxFacts {
    std::map<std::string, std::string> props;
    int64_t output_classes = 0;  // 0: not stated in the graph
    bool well_formed = true;
    bool tensors_match_dims = true;
    bool quantize_nodes = false;  // QuantizeLinear / DequantizeLinear: an int8 (QDQ) graph
};

int64_t second_dimension(const std::string& type_proto) {
    std::vector<int64_t> dims;
    walk_payload(type_proto, [&](std::istream& in, const ProtoField& tensor) {
        if (tensor.number != 1 || tensor.wire_type != 2) return;
        walk_payload(read_payload(in, tensor), [&](std::istream& in2, const ProtoField& shape) {
            if (shape.number != 2 || shape.wire_type != 2) return;
            walk_payload(read_payload(in2, shape), [&](std::istream& in3, const ProtoField& dim) {
                if (dim.number != 1 || dim.wire_type != 2) return;
                int64_t value = 0;
                walk_payload(read_payload(in3, dim), [&](std::istream&, const ProtoField& v) {
                    if (v.number == 1 && v.wire_type == 0) value = int64_t(v.value);
                });
                dims.push_back(value);
            });
        });
    });
    return dims.size() == 2 ? dims[1] : 0;
}

// OpenCV's importer trusts a tensor's dims and reads past its data when they claim more (a
// segmentation fault): each tensor must hold exactly the elements its dims declare.
int element_size(uint64_t data_type) {  // TensorProto.DataType; 0: not checked (strings)
    switch (data_type) {
        case 2: case 3: case 9: return 1;    // uint8, int8, bool
        case 4: case 5: case 10: case 16: return 2;  // uint16, int16, float16, bfloat16
        case 1: case 6: case 12: return 4;   // float, int32, uint32
        case 7: case 11: case 13: return 8;  // int64, double, uint64
        default: return 0;
    }
}

struct TensorFacts {
    std::vector<uint64_t> dims;
    uint64_t data_type = 0, raw_bytes = 0, values = 0;
    bool has_raw = false, external = false;
};

uint64_t count_varints(const std::string& packed) {  // a varint ends at each byte below 0x80
    return uint64_t(std::count_if(packed.begin(), packed.end(), [](char c) { return uint8_t(c) < 0x80; }));
}

void add_tensor_field(std::istream& in, const ProtoField& f, TensorFacts& t) {
    bool packed = f.wire_type == 2;
    if (f.number == 1 && !packed) t.dims.push_back(f.value);
    if (f.number == 1 && packed) {
        std::string payload = read_payload(in, f);
        std::istringstream dims_in(payload);
        const std::streamoff end = std::streamoff(payload.size());
        uint64_t dim = 0;
        while (dims_in.tellg() >= 0 && dims_in.tellg() < end && read_varint(dims_in, dim, end - dims_in.tellg())) t.dims.push_back(dim);
    }
    if (f.number == 2 && f.wire_type == 0) t.data_type = f.value;
    if (f.number == 9 && packed) {
        t.has_raw = true;
        t.raw_bytes = f.length;
    }
    if (f.number == 14 && f.wire_type == 0) t.external = f.value == 1;
    if (f.number == 4 || f.number == 10) t.values += packed ? f.length / (f.number == 4 ? 4 : 8) : 1;  // float, double
    if (f.number == 5 || f.number == 7 || f.number == 11) t.values += packed ? count_varints(read_payload(in, f)) : 1;
}

bool tensor_matches_dims(std::istream& in, const ProtoField& tensor) {
    TensorFacts t;
    if (!walk_message(in, tensor.start, tensor.start + std::streamoff(tensor.length),
                      [&](const ProtoField& f) { add_tensor_field(in, f, t); }))
        return false;
    int size = element_size(t.data_type);
    if (t.external || !size) return true;  // external data is the file beside it; strings vary
    uint64_t count = 1;
    for (uint64_t dim : t.dims) {
        if (dim > (uint64_t(1) << 40) || (dim && count > (uint64_t(1) << 40) / dim)) return false;
        count *= dim;
    }
    return t.has_raw ? t.raw_bytes == count * uint64_t(size) : t.values == count;
}

bool is_quantize_op(const std::string& op_type) {
    return op_type == "QuantizeLinear" || op_type == "DequantizeLinear";
}

// Initializers (GraphProto 5) and the tensors in node attributes (NodeProto 5: AttributeProto
// {5 t, 10 tensors}), the ones OpenCV copies; and each node's op_type (NodeProto 4).
void check_graph_tensors(std::istream& in, const ProtoField& f, OnnxFacts& facts) {
    if (f.wire_type != 2) return;
    if (f.number == 5) facts.tensors_match_dims &= tensor_matches_dims(in, f);
    if (f.number != 1) return;
    walk_message(in, f.start, f.start + std::streamoff(f.length), [&](const ProtoField& attribute) {
        if (attribute.number == 4 && attribute.wire_type == 2 && attribute.length <= 64)
            facts.quantize_nodes |= is_quantize_op(read_payload(in, attribute));
        if (attribute.number != 5 || attribute.wire_type != 2) return;
        walk_message(in, attribute.start, attribute.start + std::streamoff(attribute.length), [&](const ProtoField& t) {
            if ((t.number == 5 || t.number == 10) && t.wire_type == 2) facts.tensors_match_dims &= tensor_matches_dims(in, t);
        });
    });
}

void read_graph(std::istream& in, const ProtoField& graph, OnnxFacts& facts) {
    facts.well_formed &= walk_message(in, graph.start, graph.start + std::streamoff(graph.length), [&](const ProtoField& f) {
        check_graph_tensors(in, f, facts);
        if (f.number != 12 || f.wire_type != 2) return;
        std::string name, type;
        walk_payload(read_payload(in, f), [&](std::istream& value_in, const ProtoField& part) {
            if (part.wire_type == 2 && (part.number == 1 || part.number == 2))
                (part.number == 1 ? name : type) = read_payload(value_in, part);
        });
        if (name == "probs") facts.output_classes = second_dimension(type);
    });
}

OnnxFacts read_onnx_facts(std::istream& in, std::streamoff size) {
    OnnxFacts facts;
    facts.well_formed = walk_message(in, 0, size, [&](const ProtoField& f) {
        if (f.wire_type != 2) return;
        if (f.number == 7) read_graph(in, f, facts);
        if (f.number != 14) return;
        std::string kv[2];
        walk_payload(read_payload(in, f), [&](std::istream& entry_in, const ProtoField& part) {
            if (part.wire_type == 2 && (part.number == 1 || part.number == 2)) kv[part.number - 1] = read_payload(entry_in, part);
        });
        facts.props[kv[0]] = kv[1];
    });
    return facts;
}

// ---- the model's metadata ------------------------------------------------------------------

struct ClassInfo {
    int index;
    std::string synset, name;
};

struct ModelInfo {
    std::vector<ClassInfo> classes;
    std::vector<int> test_scales;
    int crop_size = 0;
};

// nlohmann::json copies values recursively: a forged value nested a million levels deep would
// overflow the stack. The metadata nests three levels; deeper JSON is not parsed.
const int MAX_JSON_DEPTH = 64;

bool nested_deeper_than(const std::string& text, int limit) {
    int depth = 0;
    bool in_string = false, escaped = false;
    for (char c : text) {
        if (in_string) {
            if (escaped) escaped = false;
            else if (c == '\\') escaped = true;
            else if (c == '"') in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > limit) return true;
        } else if (c == ']' || c == '}') {
            --depth;
        }
    }
    return false;
}

json parse_json(const std::string& text) {  // discarded when not JSON or nested too deep
    return nested_deeper_than(text, MAX_JSON_DEPTH) ? json(json::value_t::discarded) : json::parse(text, nullptr, false);
}

json read_sidecar(const std::string& model_path) {  // vgg_D.onnx -> vgg_D.json, written by export
    std::string sidecar = model_path.size() > 5 && model_path.compare(model_path.size() - 5, 5, ".onnx") == 0
                              ? model_path.substr(0, model_path.size() - 5) + ".json"
                              : model_path + ".json";
    try {
        std::vector<uint8_t> bytes = read_regular_file(sidecar, MAX_IMAGE_BYTES);
        return parse_json(std::string(bytes.begin(), bytes.end()));
    } catch (const std::runtime_error&) {
        return json();  // no sidecar: the caller reports the missing metadata
    }
}

std::string brief(const json& value) {  // a value quoted in a message, cut to one short line
    std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
    return text.size() > 60 ? text.substr(0, 57) + "..." : text;
}

bool is_int(const json& value, int64_t low) {
    return value.is_number_integer() && value.get<int64_t>() >= low && value.get<int64_t>() <= INT32_MAX;
}

// Validated once, here (docs/decoding.md, "The model"): a bad model is one line, exit 1.
ModelInfo validate_metadata(const json& meta, int64_t output_classes) {
    ModelInfo info;
    const json& crop = meta.contains("crop_size") ? meta["crop_size"] : json();
    if (!is_int(crop, 1) || crop.get<int>() % 32) throw std::runtime_error("crop_size " + brief(crop) + " is not a positive multiple of 32");
    info.crop_size = crop.get<int>();
    const json& scales = meta.contains("test_scales") ? meta["test_scales"] : json();
    if (!scales.is_array() || scales.empty()) throw std::runtime_error("test_scales " + brief(scales) + " is not a non-empty list");
    for (const json& q : scales) {
        if (!is_int(q, info.crop_size))
            throw std::runtime_error("test scale " + brief(q) + " is not an integer of at least the crop size " + std::to_string(info.crop_size));
        info.test_scales.push_back(q.get<int>());
    }
    const json& classes = meta.contains("classes") ? meta["classes"] : json();
    if (!classes.is_array() || classes.empty()) throw std::runtime_error("classes is not a non-empty list");
    for (const json& c : classes) {
        if (!c.is_object() || !is_int(c.value("index", json()), 0) || !c.value("name", json()).is_string())
            throw std::runtime_error("class entry " + brief(c) + " lacks an integer index or a name");
        const json synset = c.value("synset", json(""));
        info.classes.push_back({c["index"].get<int>(), synset.is_string() ? synset.get<std::string>() : "", c["name"].get<std::string>()});
    }
    if (output_classes && output_classes != int64_t(info.classes.size()))
        throw std::runtime_error("the graph gives " + std::to_string(output_classes) + " classes, its metadata lists " +
                                 std::to_string(info.classes.size()));
    return info;
}

// OpenCV 4.6's importer rejects the QDQ graph `vgg-onnx quantize` writes (its DequantizeLinear
// of an int32 bias fails an assertion): say so before the importer, in words a user can act on.
void check_not_int8(const std::string& model_path, const json& meta, const OnnxFacts& facts) {
    std::string evidence;
    if (meta.is_object() && meta.value("precision", json()) == json("int8")) evidence = "metadata precision \"int8\"";
    else if (facts.quantize_nodes) evidence = "QuantizeLinear/DequantizeLinear nodes in its graph";
    else return;
    throw std::runtime_error(model_path + ": an int8 model (" + evidence + "): this host does not run int8 models, "
                             "OpenCV 4.6's DNN importer rejects their graph; use the float32 model here, or the Node "
                             "host or vgg-onnx infer");
}

ModelInfo read_model_info(const std::string& model_path) {
    uint64_t size = 0;
    try {
        FileDescriptor checked{open_regular_file(model_path, MAX_MODEL_BYTES, size)};
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(model_path + ": " + e.what());
    }
    std::ifstream in(model_path, std::ios::binary);
    if (!in) throw std::runtime_error(model_path + ": cannot read: " + std::strerror(errno));
    OnnxFacts facts = read_onnx_facts(in, std::streamoff(size));
    // One JSON document (docs/decoding.md, "The model"): metadata_props["vgg_onnx"], else the sidecar.
    const auto document = facts.props.find("vgg_onnx");
    if (document == facts.props.end() && facts.props.count("vgg_onnx_format"))
        throw std::runtime_error(model_path + ": metadata format 1 (an older vgg-onnx, one key a field): export it again with this version");
    const json meta = document != facts.props.end() ? parse_json(document->second) : read_sidecar(model_path);
    if (document != facts.props.end() && !meta.is_object())
        throw std::runtime_error(model_path + ": malformed vgg-onnx metadata (the \"vgg_onnx\" value is not a JSON object)");
    const json format = meta.is_object() ? meta.value("vgg_onnx_format", json()) : json();
    if (format.is_null())
        throw std::runtime_error(model_path + ": no vgg-onnx metadata (not exported by vgg-onnx export)");
    if (!format.is_number_integer() || format.get<int64_t>() != 2)
        throw std::runtime_error(model_path + ": vgg-onnx metadata format " + brief(format) + ", this host reads format 2");
    if (!facts.well_formed) throw std::runtime_error(model_path + ": not a well-formed ONNX file (truncated or corrupt)");
    if (!facts.tensors_match_dims) throw std::runtime_error(model_path + ": not a well-formed ONNX file (a tensor's data does not match its dims)");
    check_not_int8(model_path, meta, facts);
    try {
        return validate_metadata(meta, facts.output_classes);
    } catch (const std::exception& e) {
        throw std::runtime_error(model_path + ": malformed vgg-onnx metadata (" + e.what() + ")");
    }
}

// ---- the image header (docs/decoding.md) ---------------------------------------------------

struct ImageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Reads big- or little-endian integers; every read is bounds-checked, a short header is corrupt.
struct HeaderBytes {
    const std::vector<uint8_t>& data;
    uint64_t get(size_t pos, int size, bool big_endian) const {
        if (pos + size_t(size) > data.size() || pos + size_t(size) < pos) throw ImageError("truncated or corrupt image header");
        uint64_t value = 0;
        for (int i = 0; i < size; ++i) value |= uint64_t(data[pos + size_t(i)]) << (8 * (big_endian ? size - 1 - i : i));
        return value;
    }
    static bool same(char a, uint8_t b) { return uint8_t(a) == b; }
    bool starts(size_t pos, const std::string& text) const {
        return data.size() >= pos + text.size() && std::equal(text.begin(), text.end(), data.begin() + long(pos), same);
    }
    bool contains_from(size_t pos, const std::string& text) const {
        auto from = data.begin() + long(std::min(pos, data.size()));
        return std::search(from, data.end(), text.begin(), text.end(), [](uint8_t b, char a) { return same(a, b); }) != data.end();
    }
};

bool is_frame_marker(int marker) {  // SOF0-3, 5-7, 9-11, 13-15 give the frame size
    return marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
}

std::pair<int64_t, int64_t> jpeg_size(const HeaderBytes& b) {
    size_t pos = 2, n = b.data.size();
    while (pos + 4 <= n) {
        if (b.data[pos] != 0xFF) throw ImageError("corrupt JPEG (bad marker)");
        int marker = b.data[pos + 1];
        if (marker == 0xFF) { ++pos; continue; }  // fill byte
        if (marker == 0x01 || marker == 0xD8 || (marker >= 0xD0 && marker <= 0xD7)) { pos += 2; continue; }
        size_t length = size_t(b.get(pos + 2, 2, true));
        if (is_frame_marker(marker)) {
            if (pos + 9 > n) break;
            int64_t height = int64_t(b.get(pos + 5, 2, true)), width = int64_t(b.get(pos + 7, 2, true));
            // a truncated file has no end-of-image marker after its scans
            if (!b.contains_from(pos, "\xff\xd9")) throw ImageError("truncated JPEG (no end-of-image marker)");
            return {width, height};
        }
        if (marker == 0xDA || marker == 0xD9) break;
        pos += 2 + length;
    }
    throw ImageError("truncated or corrupt JPEG (no frame header)");
}

// The first ImageWidth/ImageLength entry counts, as in libtiff (a duplicated tag is ignored).
std::pair<int64_t, int64_t> tiff_size(const HeaderBytes& b) {
    bool big = b.data[0] == 'M';
    try {
        size_t ifd = size_t(b.get(4, 4, big)), count = size_t(b.get(ifd, 2, big));
        int64_t found[2] = {-1, -1};
        for (size_t i = 0; i < count; ++i) {
            size_t entry = ifd + 2 + 12 * i;
            uint64_t tag = b.get(entry, 2, big), type = b.get(entry + 2, 2, big);
            if ((tag == 256 || tag == 257) && found[tag - 256] < 0) found[tag - 256] = int64_t(b.get(entry + 8, type == 3 ? 2 : 4, big));
        }
        if (found[0] >= 0 && found[1] >= 0) return {found[0], found[1]};
    } catch (const ImageError&) {
    }
    throw ImageError("truncated or corrupt TIFF header");
}

std::pair<int64_t, int64_t> pnm_size(const std::vector<uint8_t>& data) {
    std::vector<std::string> tokens;
    size_t pos = 2, n = std::min<size_t>(data.size(), 4096);
    while (tokens.size() < 2 && pos < n) {
        while (pos < data.size() && std::isspace(data[pos])) ++pos;
        if (pos < data.size() && data[pos] == '#') {
            while (pos < data.size() && data[pos] != '\n') ++pos;
            continue;
        }
        size_t start = pos;
        while (pos < data.size() && !std::isspace(data[pos])) ++pos;
        tokens.emplace_back(data.begin() + long(start), data.begin() + long(pos));
    }
    auto number = [](const std::string& t) {
        if (t.empty() || t.size() > 12 || !std::all_of(t.begin(), t.end(), ::isdigit)) throw ImageError("corrupt PNM header");
        return std::stoll(t);
    };
    if (tokens.size() < 2) throw ImageError("corrupt PNM header");
    return {number(tokens[0]), number(tokens[1])};
}

std::pair<int64_t, int64_t> webp_size(const HeaderBytes& b) {
    if (b.starts(12, "VP8 ")) return {int64_t(b.get(26, 2, false) & 0x3FFF), int64_t(b.get(28, 2, false) & 0x3FFF)};
    if (b.starts(12, "VP8L")) {
        uint64_t b0 = b.get(21, 1, false), b1 = b.get(22, 1, false), b2 = b.get(23, 1, false), b3 = b.get(24, 1, false);
        return {int64_t(1 + (((b1 & 0x3F) << 8) | b0)), int64_t(1 + (((b3 & 0xF) << 10) | (b2 << 2) | (b1 >> 6)))};
    }
    if (b.starts(12, "VP8X")) return {int64_t(1 + b.get(24, 3, false)), int64_t(1 + b.get(27, 3, false))};
    throw ImageError("corrupt WebP header");
}

// (width, height) from the header alone, so that huge images are refused undecoded.
std::pair<int64_t, int64_t> image_size_from_header(const std::vector<uint8_t>& data) {
    HeaderBytes b{data};
    if (b.starts(0, "\xff\xd8")) return jpeg_size(b);
    if (b.starts(0, "\x89PNG\r\n\x1a\n")) {
        if (!b.starts(12, "IHDR")) throw ImageError("corrupt PNG header");
        return {int64_t(b.get(16, 4, true)), int64_t(b.get(20, 4, true))};
    }
    if (b.starts(0, "GIF87a") || b.starts(0, "GIF89a")) return {int64_t(b.get(6, 2, false)), int64_t(b.get(8, 2, false))};
    if (b.starts(0, "BM")) {
        if (b.get(14, 4, false) == 12) return {int64_t(b.get(18, 2, false)), int64_t(b.get(20, 2, false))};
        return {std::llabs(int32_t(b.get(18, 4, false))), std::llabs(int32_t(b.get(22, 4, false)))};
    }
    if (b.starts(0, "RIFF") && b.starts(8, "WEBP")) return webp_size(b);
    if (b.starts(0, std::string("II*\0", 4)) || b.starts(0, std::string("MM\0*", 4))) return tiff_size(b);
    if (data.size() >= 2 && data[0] == 'P' && data[1] >= '1' && data[1] <= '6') return pnm_size(data);
    throw ImageError("not a supported image (JPEG, PNG, BMP, GIF, WebP, TIFF or PNM)");
}

// ---- preprocessing (docs/protocol.md §5, docs/decoding.md) ---------------------------------

// Isotropic rescale: the shorter side becomes q, the longer floor(L*q/short + 1/2), in integers.
std::pair<int64_t, int64_t> rescaled_size(int64_t w, int64_t h, int64_t q) {
    return w <= h ? std::make_pair(q, (2 * h * q + w) / (2 * w)) : std::make_pair((2 * w * q + h) / (2 * h), q);
}

// Rotation by EXIF swaps width and height, which leaves the rescaled area as it is.
void check_rescaled_size(int64_t width, int64_t height, int q, int64_t max_pixels) {
    auto [w, h] = rescaled_size(width, height, q);
    if (w * h > max_pixels)
        throw ImageError("rescaled to " + std::to_string(w) + "x" + std::to_string(h) +
                         " it would exceed the pixel limit of " + std::to_string(max_pixels));
}

cv::Mat rescale(const cv::Mat& image, int q) {
    int64_t w = image.cols, h = image.rows;
    auto [new_w, new_h] = rescaled_size(w, h, q);
    cv::Size size{int(new_w), int(new_h)};
    if (size == image.size()) return image;
    cv::Mat out;
    cv::resize(image, out, size, 0, 0, q < std::min(w, h) ? cv::INTER_AREA : cv::INTER_LINEAR);
    return out;
}

// libpng and libtiff print their own warnings to stderr ("libpng warning: iCCP: ..."), past
// OpenCV's log level: a decoder runs with stderr on /dev/null; a failure is reported by us.
class QuietStderr {
    int saved_ = -1;

public:
    QuietStderr() {
        std::fflush(stderr);
        int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (null < 0) return;
        saved_ = ::dup(2);
        ::dup2(null, 2);
        ::close(null);
    }
    ~QuietStderr() {
        if (saved_ < 0) return;
        std::fflush(stderr);
        ::dup2(saved_, 2);
        ::close(saved_);
    }
    QuietStderr(const QuietStderr&) = delete;
    QuietStderr& operator=(const QuietStderr&) = delete;
};

cv::Mat decode(std::vector<uint8_t>& data) {
    QuietStderr quiet;
    return cv::imdecode(cv::Mat(1, int(data.size()), CV_8U, data.data()), cv::IMREAD_ANYDEPTH | cv::IMREAD_ANYCOLOR);
}

// Decodes by docs/decoding.md: the header's size is checked against the pixel limit (for the image
// and for each rescaled image) before decoding. 8-bit RGB: grayscale replicated, alpha dropped
// (IMREAD_ANYCOLOR), 16-bit scaled to 8 bits, EXIF orientation applied (every imread flag but
// IMREAD_UNCHANGED does that).
cv::Mat load_rgb(const std::string& path, int64_t max_pixels, const std::vector<int>& scales) {
    std::vector<uint8_t> data = read_regular_file(path, MAX_IMAGE_BYTES);
    if (data.empty()) throw ImageError("empty file");
    auto [width, height] = image_size_from_header(data);
    if (width <= 0 || height <= 0) throw ImageError("invalid image size " + std::to_string(width) + "x" + std::to_string(height));
    if (width * height > max_pixels)
        throw ImageError(std::to_string(width) + "x" + std::to_string(height) + " image exceeds the pixel limit of " +
                         std::to_string(max_pixels) + " (--max-pixels)");
    for (int q : scales) check_rescaled_size(width, height, q, max_pixels);
    if (HeaderBytes{data}.starts(0, "\x89PNG\r\n\x1a\n") && !HeaderBytes{data}.contains_from(0, "IEND"))
        throw ImageError("truncated PNG (no IEND chunk)");
    cv::Mat image = decode(data);
    if (image.empty()) throw ImageError("cannot decode image (corrupt or unsupported)");
    if (image.depth() == CV_16U) image.convertTo(image, CV_8U, 255.0 / 65535.0);
    if (image.depth() != CV_8U) throw ImageError("unsupported sample type");
    cv::Mat rgb;
    cv::cvtColor(image, rgb, image.channels() == 1 ? cv::COLOR_GRAY2RGB
                             : image.channels() == 4 ? cv::COLOR_BGRA2RGB : cv::COLOR_BGR2RGB);
    return rgb;
}

// ---- dense evaluation ----------------------------------------------------------------------

// Network input: float32 1x3xHxW, RGB, 0..255; the graph normalises. Its 'probs' output is
// softmax(spatial mean of 'scores'): 1 x classes, converted to float64 for the averaging.
cv::Mat run_probs(cv::dnn::Net& net, const cv::Mat& rgb) {
    net.setInput(cv::dnn::blobFromImage(rgb), "image");
    cv::Mat probs;
    net.forward("probs").convertTo(probs, CV_64F);
    return probs.reshape(1, 1);
}

// The graph's probs per image, mean over {image, mirror}, then mean over scales.
cv::Mat classify(cv::dnn::Net& net, const cv::Mat& rgb, const std::vector<int>& scales, bool flip) {
    cv::Mat total;
    for (int q : scales) {
        cv::Mat scaled = rescale(rgb, q), mirrored;
        cv::Mat probs = run_probs(net, scaled);
        if (flip) {
            cv::flip(scaled, mirrored, 1);
            probs = (probs + run_probs(net, mirrored)) / 2;
        }
        total = total.empty() ? probs : total + probs;
    }
    return total / double(scales.size());
}

json top_k(const cv::Mat& probs, const ModelInfo& info) {
    if (probs.cols != int(info.classes.size()))
        throw std::runtime_error("the graph gives " + std::to_string(probs.cols) + " classes, its metadata lists " +
                                 std::to_string(info.classes.size()));
    std::vector<int> order(probs.cols);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return probs.at<double>(a) > probs.at<double>(b); });
    json top = json::array();
    for (int i = 0; i < std::min<int>(TOP_K, probs.cols); ++i) {
        const ClassInfo& c = info.classes.at(order[i]);
        top.push_back({{"index", c.index}, {"synset", c.synset}, {"name", c.name}, {"prob", probs.at<double>(order[i])}});
    }
    return top;
}

// Hidden test hook: run the graph on a raw float32 1x3xHxW tensor; print 'scores' and the posterior.
int run_raw(cv::dnn::Net& net, const std::string& file, const std::vector<int>& shape) {
    if (shape.size() != 4 || shape[0] != 1) throw UsageError("--shape must be 1,C,H,W");
    cv::Mat blob(4, shape.data(), CV_32F);
    std::vector<uint8_t> bytes;
    try {
        bytes = read_regular_file(file, MAX_IMAGE_BYTES);
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(file + ": " + e.what());
    }
    if (bytes.size() != blob.total() * sizeof(float)) throw std::runtime_error(file + ": size does not match --shape");
    std::memcpy(blob.data, bytes.data(), bytes.size());
    net.setInput(blob, "image");
    std::vector<cv::Mat> outputs;
    net.forward(outputs, std::vector<cv::String>{"scores", "probs"});
    cv::Mat scores = outputs[0], probs;
    outputs[1].convertTo(probs, CV_64F);
    probs = probs.reshape(1, 1);
    json result = {{"scores", {{"shape", std::vector<int>(scores.size.p, scores.size.p + scores.dims)},
                               {"data", std::vector<float>(scores.ptr<float>(), scores.ptr<float>() + scores.total())}}},
                   {"probs", {{"shape", {1, probs.cols}}, {"data", std::vector<double>(probs.begin<double>(), probs.end<double>())}}}};
    std::cout << result.dump() << "\n";
    return 0;
}

std::vector<int> parse_ints(const std::string& text, const std::string& option) {
    std::vector<int> values;
    std::stringstream in(text);
    std::string part;
    while (std::getline(in, part, ',')) {
        size_t used = 0;
        int value = 0;
        try {
            value = std::stoi(part, &used);
        } catch (const std::exception&) {
        }
        if (used != part.size() || value <= 0) throw UsageError(option + " '" + text + "' must be comma-separated positive integers");
        values.push_back(value);
    }
    if (values.empty()) throw UsageError(option + " is empty");
    return values;
}

std::string one_line(std::string text) {
    std::replace(text.begin(), text.end(), '\n', ' ');
    return text;
}

int64_t parse_max_pixels(const std::string& text) {
    size_t used = 0;
    long long value = 0;
    try {
        value = std::stoll(text, &used);
    } catch (const std::exception&) {
    }
    if (used != text.size() || value <= 0) throw UsageError("--max-pixels " + text + " must be positive");
    return value;
}

struct Options {
    std::vector<std::string> positional;
    std::vector<int> scales, shape;
    std::string raw_input;
    bool flip = true, help = false;
    int64_t max_pixels = DEFAULT_MAX_PIXELS;
};

Options parse_options(int argc, char** argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw UsageError(arg + " needs a value");
            return argv[++i];
        };
        if (arg == "--scales") options.scales = parse_ints(value(), arg);
        else if (arg == "--no-flip") options.flip = false;
        else if (arg == "--max-pixels") options.max_pixels = parse_max_pixels(value());
        else if (arg == "--raw-input") options.raw_input = value();
        else if (arg == "--shape") options.shape = parse_ints(value(), arg);
        else if (arg == "-h" || arg == "--help") options.help = true;
        else if (arg.rfind("--", 0) == 0) throw UsageError("unknown option " + arg);
        else options.positional.push_back(arg);
    }
    return options;
}

// One record per image, in order; a bad image is an error record and the batch goes on.
int classify_images(cv::dnn::Net& net, const ModelInfo& info, const Options& options, const std::vector<int>& scales) {
    const std::string& model_path = options.positional[0];
    json records = json::array();
    int failed = 0;
    for (size_t i = 1; i < options.positional.size(); ++i) {
        const std::string& path = options.positional[i];
        auto start = std::chrono::steady_clock::now();
        try {
            cv::Mat probs = classify(net, load_rgb(path, options.max_pixels, scales), scales, options.flip);
            double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            records.push_back({{"path", path}, {"top_k", top_k(probs, info)}, {"method", "dense"},
                               {"scales", scales}, {"models", {model_path}}, {"seconds", std::round(seconds * 1e4) / 1e4}});
        } catch (const std::exception& e) {
            const cv::Exception* cv_error = dynamic_cast<const cv::Exception*>(&e);
            std::string reason = one_line(cv_error ? cv_error->err : e.what());
            std::cerr << "classify: error: " << path << ": " << reason << "\n";
            records.push_back({{"path", path}, {"error", path + ": " + reason}});
            ++failed;
        }
    }
    std::cout << records.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    return failed ? 1 : 0;
}

int run(int argc, char** argv) {
    Options options = parse_options(argc, argv);
    if (options.help) { std::cout << USAGE << "\n"; return 0; }
    if (options.positional.empty() || (options.raw_input.empty() && options.positional.size() < 2))
        throw UsageError("a model and at least one image are required");

    const std::string& model_path = options.positional[0];
    ModelInfo info = read_model_info(model_path);
    std::vector<int> scales = options.scales.empty() ? info.test_scales : options.scales;
    for (int q : scales)
        if (q < info.crop_size) throw UsageError("scale " + std::to_string(q) + " is smaller than the model's crop size " + std::to_string(info.crop_size));
    cv::dnn::Net net;
    try {
        net = cv::dnn::readNetFromONNX(model_path);
    } catch (const cv::Exception& e) {
        throw std::runtime_error(model_path + ": OpenCV cannot load the graph: " + one_line(e.err));
    }
    if (!options.raw_input.empty()) return run_raw(net, options.raw_input, options.shape);
    return classify_images(net, info, options, scales);
}

}  // namespace

int main(int argc, char** argv) {
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);  // errors are reported below, once
    try {
        return run(argc, argv);
    } catch (const UsageError& e) {
        std::cerr << "classify: error: " << e.what() << "\n" << USAGE << "\n";
        return 2;
    } catch (const std::exception& e) {
        std::cerr << "classify: error: " << one_line(e.what()) << "\n";
        return 1;
    }
}
