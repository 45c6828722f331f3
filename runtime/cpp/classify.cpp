// classify: multi-scale dense evaluation of a vgg-onnx model with OpenCV alone (PAPER.md §3, §5).
//
//   classify MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip]
//
// Prints a JSON array in the schema of `vgg-onnx infer --format json`. OpenCV decodes and
// rescales the image and runs the same .onnx file Python runs (cv::dnn::readNetFromONNX).
// OpenCV 4.6's importer runs this graph one image at a time, for any H and W, so the image and
// its mirror are two runs. The model's metadata (classes, test scales) is read from the .onnx
// file's metadata_props, or from the JSON file export writes beside it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/dnn.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

using json = nlohmann::ordered_json;

namespace {

const char* USAGE = "usage: classify MODEL.onnx IMAGE... [--scales 256,384,512] [--no-flip]";
const int TOP_K = 5;

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ---- the model's metadata ------------------------------------------------------------------

// An .onnx file is a protobuf ModelProto; metadata_props is its field 14, each entry a message
// {1: key, 2: value}. Walking the top-level fields skips the (large) graph without parsing it.
bool read_varint(std::istream& in, uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        int byte = in.get();
        if (byte == EOF) return false;
        value |= uint64_t(byte & 0x7f) << shift;
        if (!(byte & 0x80)) return true;
    }
    return false;
}

std::map<std::string, std::string> read_metadata_props(std::istream& in, std::streamoff end) {
    std::map<std::string, std::string> props;
    uint64_t tag, length, ignored;
    while (in.tellg() < end && read_varint(in, tag)) {
        int field = int(tag >> 3), wire_type = int(tag & 7);
        if (wire_type == 0) {
            if (!read_varint(in, ignored)) break;
        } else if (wire_type == 1 || wire_type == 5) {
            in.seekg(wire_type == 1 ? 8 : 4, std::ios::cur);
        } else if (wire_type == 2 && read_varint(in, length) && in.tellg() + std::streamoff(length) <= end) {
            if (field != 14) {
                in.seekg(std::streamoff(length), std::ios::cur);
                continue;
            }
            std::string entry(length, '\0');
            in.read(entry.data(), std::streamsize(length));
            std::istringstream entry_in(entry);
            std::string kv[2];
            while (read_varint(entry_in, tag) && (tag == 10 || tag == 18) && read_varint(entry_in, length)) {
                std::string& s = kv[tag == 18];
                s.resize(length);
                entry_in.read(s.data(), std::streamsize(length));
            }
            props[kv[0]] = kv[1];
        } else {
            break;  // not a protobuf we understand: no metadata
        }
    }
    return props;
}

struct ClassInfo {
    int index;
    std::string synset, name;
};

struct ModelInfo {
    std::vector<ClassInfo> classes;
    std::vector<int> test_scales;
    int crop_size = 0;
};

// metadata_props values are strings, structured ones JSON: decode them into the sidecar's shape.
json decode_props(const std::map<std::string, std::string>& props) {
    json meta = json::object();
    for (const auto& [key, value] : props) {
        json parsed = json::parse(value, nullptr, false);
        meta[key] = parsed.is_discarded() ? json(value) : parsed;
    }
    return meta;
}

ModelInfo read_model_info(const std::string& model_path) {
    std::ifstream in(model_path, std::ios::binary | std::ios::ate);
    if (!in) throw std::runtime_error(model_path + ": cannot read: " + std::strerror(errno));
    std::streamoff size = in.tellg();
    in.seekg(0);
    json meta = decode_props(read_metadata_props(in, size));
    if (meta.empty()) {  // export also writes the metadata beside the model: vgg_D.onnx -> vgg_D.json
        std::string sidecar = model_path.size() > 5 && model_path.compare(model_path.size() - 5, 5, ".onnx") == 0
                                  ? model_path.substr(0, model_path.size() - 5) + ".json"
                                  : model_path + ".json";
        std::ifstream sidecar_in(sidecar);
        if (sidecar_in) meta = json::parse(sidecar_in, nullptr, false);
    }
    const json format = meta.is_object() ? meta.value("vgg_onnx_format", json()) : json();
    if (format != json("1") && format != json(1))
        throw std::runtime_error(model_path + ": no vgg-onnx metadata (not exported by vgg-onnx export)");
    try {
        ModelInfo info;
        for (const auto& c : meta.at("classes"))
            info.classes.push_back({c.at("index").get<int>(), c.value("synset", ""), c.at("name").get<std::string>()});
        info.test_scales = meta.at("test_scales").get<std::vector<int>>();
        info.crop_size = meta.at("crop_size").get<int>();
        return info;
    } catch (const json::exception& e) {
        throw std::runtime_error(model_path + ": malformed vgg-onnx metadata (" + e.what() + ")");
    }
}

// ---- preprocessing (PAPER.md §5) -----------------------------------------------------------

// 8-bit RGB: grayscale replicated, alpha dropped (IMREAD_ANYCOLOR), 16-bit scaled to 8 bits,
// EXIF orientation applied (every imread flag but IMREAD_UNCHANGED does that).
cv::Mat load_rgb(const std::string& path) {
    if (!std::ifstream(path, std::ios::binary)) throw std::runtime_error("cannot read: " + std::string(std::strerror(errno)));
    cv::Mat image = cv::imread(path, cv::IMREAD_ANYDEPTH | cv::IMREAD_ANYCOLOR);
    if (image.empty()) throw std::runtime_error("cannot decode image (corrupt or unsupported)");
    if (image.depth() == CV_16U) image.convertTo(image, CV_8U, 255.0 / 65535.0);
    if (image.depth() != CV_8U) throw std::runtime_error("unsupported sample type");
    cv::Mat rgb;
    cv::cvtColor(image, rgb, image.channels() == 1 ? cv::COLOR_GRAY2RGB
                             : image.channels() == 4 ? cv::COLOR_BGRA2RGB : cv::COLOR_BGR2RGB);
    return rgb;
}

// Isotropic rescale: the shorter side becomes q, the longer floor(L*q/short + 1/2), in integers.
cv::Mat rescale(const cv::Mat& image, int q) {
    int64_t w = image.cols, h = image.rows;
    cv::Size size = w <= h ? cv::Size(q, int((2 * h * q + w) / (2 * w))) : cv::Size(int((2 * w * q + h) / (2 * h)), q);
    if (size == image.size()) return image;
    cv::Mat out;
    cv::resize(image, out, size, 0, 0, q < std::min(w, h) ? cv::INTER_AREA : cv::INTER_LINEAR);
    return out;
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
    std::ifstream in(file, std::ios::binary);
    in.read(reinterpret_cast<char*>(blob.data), std::streamsize(blob.total() * sizeof(float)));
    if (!in || in.peek() != EOF) throw std::runtime_error(file + ": size does not match --shape");
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

int run(int argc, char** argv) {
    std::vector<std::string> positional;
    std::vector<int> scales, shape;
    std::string raw_input;
    bool flip = true;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw UsageError(arg + " needs a value");
            return argv[++i];
        };
        if (arg == "--scales") scales = parse_ints(value(), arg);
        else if (arg == "--no-flip") flip = false;
        else if (arg == "--raw-input") raw_input = value();
        else if (arg == "--shape") shape = parse_ints(value(), arg);
        else if (arg == "-h" || arg == "--help") { std::cout << USAGE << "\n"; return 0; }
        else if (arg.rfind("--", 0) == 0) throw UsageError("unknown option " + arg);
        else positional.push_back(arg);
    }
    if (positional.empty() || (raw_input.empty() && positional.size() < 2)) throw UsageError("a model and at least one image are required");

    const std::string model_path = positional[0];
    ModelInfo info = read_model_info(model_path);
    if (scales.empty()) scales = info.test_scales;
    for (int q : scales)
        if (q < info.crop_size) throw UsageError("scale " + std::to_string(q) + " is smaller than the model's crop size " + std::to_string(info.crop_size));
    cv::dnn::Net net;
    try {
        net = cv::dnn::readNetFromONNX(model_path);
    } catch (const cv::Exception& e) {
        throw std::runtime_error(model_path + ": OpenCV cannot load the graph: " + one_line(e.err));
    }
    if (!raw_input.empty()) return run_raw(net, raw_input, shape);

    json records = json::array();
    int failed = 0;
    for (size_t i = 1; i < positional.size(); ++i) {
        const std::string& path = positional[i];
        auto start = std::chrono::steady_clock::now();
        try {
            cv::Mat probs = classify(net, load_rgb(path), scales, flip);
            double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            records.push_back({{"path", path}, {"top_k", top_k(probs, info)}, {"method", "dense"},
                               {"scales", scales}, {"models", {model_path}}, {"seconds", std::round(seconds * 1e4) / 1e4}});
        } catch (const std::exception& e) {  // one bad image does not stop the batch
            const cv::Exception* cv_error = dynamic_cast<const cv::Exception*>(&e);
            std::string reason = one_line(cv_error ? cv_error->err : e.what());
            std::cerr << "classify: error: " << path << ": " << reason << "\n";
            records.push_back({{"path", path}, {"error", path + ": " + reason}});
            ++failed;
        }
    }
    std::cout << records.dump(2) << "\n";
    return failed ? 1 : 0;
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
