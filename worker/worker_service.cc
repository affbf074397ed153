#include "worker/worker_service.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "proto/worker.grpc.pb.h"
#include "runtime/kv_capacity.h"
#include "runtime/kv_quant_params.h"
#include "runtime/sampling.h"
#include "runtime/status_macros.h"
#include "spdlog/spdlog.h"
#include "worker/collectives_gloo.h"
#include "worker/collectives_grpc_store.h"
#include "worker/cpu_engine.h"
#include "worker/shard.h"
#if STRATA_HAVE_CUDA
#include <cuda_runtime.h>

#include "worker/collectives_nccl.h"
#include "worker/cuda_engine.h"
#endif

namespace strata {

namespace v1 = worker::v1;

bool SecretsEqual(std::string_view a, std::string_view b) {
  if (a.empty() || b.empty()) return false;
  // Time depends on the lengths only, not on where the contents differ.
  unsigned diff = a.size() != b.size() ? 1u : 0u;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0, y = i < b.size() ? b[i] : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--secret-file ", path, ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t')) s.pop_back();
  if (s.empty()) return absl::InvalidArgumentError(absl::StrCat("--secret-file ", path, " is empty"));
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
    spdlog::warn("secret file {} is readable by group or others (mode {:o}); use chmod 600",
                 path, st.st_mode & 0777);
  }
  return s;
}

// ---- the session ----------------------------------------------------------------

namespace {

int64_t MemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return -1;
}


int64_t MicrosSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
      .count();
}

}  // namespace

class WorkerSession::Impl {
 public:
  explicit Impl(WorkerOptions o) : o_(std::move(o)) {}

  absl::Status Run() {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
    // Logits replies are ~128 KB per sequence: a large flow-control window
    // keeps them from waiting on WINDOW_UPDATE round trips.
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
    channel_ = grpc::CreateCustomChannel(o_.scheduler_address, grpc::InsecureChannelCredentials(), args);
    const auto deadline = std::chrono::system_clock::now() +
                          std::chrono::milliseconds(absl::ToInt64Milliseconds(o_.connect_timeout));
    if (!channel_->WaitForConnected(deadline)) {
      return absl::UnavailableError(absl::StrCat("cannot reach the scheduler at ", o_.scheduler_address,
                                                 " within ", absl::FormatDuration(o_.connect_timeout)));
    }
    auto stub = v1::WorkerControl::NewStub(channel_);
    grpc::ClientContext ctx;
    ctx.AddMetadata(kSecretMetadataKey, o_.secret);
    auto stream = stub->Connect(&ctx);
    v1::WorkerMessage hello;
    v1::Hello* h = hello.mutable_hello();
    h->set_protocol_version(kWorkerProtocolVersion);
    h->set_rank(o_.rank);
    h->set_world_size(o_.world_size);
    h->set_pid(::getpid());
    char host[256] = {0};
    ::gethostname(host, sizeof(host) - 1);
    h->set_hostname(host);
    v1::SchedulerMessage msg;
    v1::WorkerMessage reply;
    absl::Status fatal;
    bool wrote = stream->Write(hello);
    // The scheduler's messages are read by their own thread, so that a Read
    // is pending on the stream while a long Init (loading weights) or Step
    // runs on this one: a synchronous stream is only polled inside its calls,
    // and without that the connection would not answer the scheduler's
    // keepalive pings, which then drops a busy worker as lost. One reader
    // and one writer may use a stream at the same time.
    struct Inbox {
      absl::Mutex mu;
      std::deque<v1::SchedulerMessage> queue;
      bool closed = false;
      bool Ready() const { return !queue.empty() || closed; }
    } inbox;
    std::thread reader;
    if (wrote) {
      reader = std::thread([&] {
        v1::SchedulerMessage m;
        while (stream->Read(&m)) {
          absl::MutexLock lock(&inbox.mu);
          inbox.queue.push_back(std::move(m));
        }
        absl::MutexLock lock(&inbox.mu);
        inbox.closed = true;
      });
    }
    // Stops the reader: `cancel` for an abnormal end (its Read returns at
    // once); otherwise it ends when the scheduler closes the stream.
    auto stop_reader = [&](bool cancel) {
      if (cancel) ctx.TryCancel();
      if (reader.joinable()) reader.join();
    };
    auto next = [&](v1::SchedulerMessage* out) {
      absl::MutexLock lock(&inbox.mu);
      inbox.mu.Await(absl::Condition(&inbox, &Inbox::Ready));
      if (inbox.queue.empty()) return false;  // the stream ended
      *out = std::move(inbox.queue.front());
      inbox.queue.pop_front();
      return true;
    };
    v1::Step step_msg;
    std::chrono::steady_clock::time_point t0;
    auto run_step = [&](const v1::Step& step) {
      v1::StepResult* r = reply.mutable_step_result();
      r->set_step_id(step.step_id());
      const absl::Status s = HandleStep(step, r);
      StatusToProto(s, r->mutable_status());
      // A step rejected by validation leaves every rank in lockstep;
      // anything else (a collective failed) does not.
      if (!s.ok() && s.code() != absl::StatusCode::kInvalidArgument) fatal = s;
      r->set_worker_us(MicrosSince(t0));
    };
    while (wrote && next(&msg)) {
      t0 = std::chrono::steady_clock::now();
      reply.Clear();
      switch (msg.kind_case()) {
        case v1::SchedulerMessage::kInit: {
          v1::Ready* r = reply.mutable_ready();
          StatusToProto(HandleInit(msg.init(), r), r->mutable_status());
          break;
        }
        case v1::SchedulerMessage::kAllocate: {
          v1::Allocated* a = reply.mutable_allocated();
          StatusToProto(HandleAllocate(msg.allocate(), a->mutable_memory()), a->mutable_status());
          break;
        }
        case v1::SchedulerMessage::kStepSerialized:
          // Parsed into a message kept across steps: its sequences'
          // allocations are reused.
          if (!step_msg.ParseFromString(msg.step_serialized())) {
            fatal = absl::InvalidArgumentError("the scheduler sent a step that does not parse");
            break;
          }
          run_step(step_msg);
          break;
        case v1::SchedulerMessage::kShutdown:
          spdlog::info("rank {}: shutdown requested ({})", o_.rank, msg.shutdown().reason());
          stream->WritesDone();
          stop_reader(/*cancel=*/false);  // the scheduler closes the stream
          (void)stream->Finish();
          return absl::OkStatus();
        default:
          fatal = absl::InvalidArgumentError("unknown scheduler message");
          break;
      }
      wrote = stream->Write(reply);
      if (!fatal.ok()) break;
    }
    if (!fatal.ok()) {
      stop_reader(/*cancel=*/true);
      (void)stream->Finish();
      return fatal;
    }
    // The stream ended (or a write failed on a closed stream): the reader's
    // Read returns by itself; no cancel, which would hide the scheduler's
    // status (UNAUTHENTICATED for a wrong secret).
    stop_reader(/*cancel=*/false);
    const grpc::Status st = stream->Finish();
    if (st.error_code() == grpc::StatusCode::UNAUTHENTICATED) return FromGrpcStatus(st);
    return absl::UnavailableError(absl::StrCat("the scheduler closed the control stream: ",
                                               st.ok() ? "OK" : st.error_message()));
  }

 private:
  absl::Status HandleInit(const v1::Init& init, v1::Ready* ready) {
    if (engine_ != nullptr || weights_.has_value()) return absl::FailedPreconditionError("Init twice");
    if (init.kv_dtype() < 0 || init.kv_dtype() > 6 || init.kv_scale_mode() < 0 || init.kv_scale_mode() > 2) {
      return absl::InvalidArgumentError("unknown KV cache format");
    }
    format_ = {static_cast<KvDtype>(init.kv_dtype()), static_cast<KvScaleMode>(init.kv_scale_mode())};
    block_size_ = init.block_size();
    rendezvous_prefix_ = init.rendezvous_prefix();
    collective_timeout_ = absl::Milliseconds(init.collective_timeout_ms() > 0 ? init.collective_timeout_ms() : 60000);
    const ShardSpec spec{o_.rank, o_.world_size};
    const auto t0 = std::chrono::steady_clock::now();
    device_ = init.device().empty() ? "cpu" : init.device();
    if (device_ != "cpu" && device_ != "cuda") {
      return absl::InvalidArgumentError(absl::StrCat("unknown device '", device_, "' (cpu or cuda)"));
    }
    if (!init.kv_quant_params_path().empty()) {
      ASSIGN_OR_RETURN(quant_params_, LoadKvQuantParams(init.kv_quant_params_path()));
    }
    if (device_ == "cuda") return InitCuda(init, spec, t0, ready);
    if (init.load_format() == "dummy") {
      ASSIGN_OR_RETURN(ModelConfig c, NamedModelShape(init.dummy_shape()));
      ASSIGN_OR_RETURN(weights_, SliceWeights(RandomWeights(c, init.dummy_seed()), spec));
    } else if (init.load_format() == "auto" || init.load_format().empty()) {
      ASSIGN_OR_RETURN(weights_, LoadShardWeights(init.model_path(), spec));
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown load format '", init.load_format(), "'"));
    }
    const ModelConfig& c = weights_->config;
    ASSIGN_OR_RETURN(const ShardDims dims, ComputeShardDims(c, spec));
    const KvCacheShape shape{format_, block_size_, dims.num_kv_heads, c.head_dim, c.num_layers};
    RETURN_IF_ERROR(ValidateKvCacheShape(shape));
    const int64_t per_block = KvBytesPerBlock(shape);
    const int64_t avail = MemAvailableBytes();
    if (o_.num_kv_blocks > 0) {
      max_gpu_blocks_ = o_.num_kv_blocks;
    } else {
      int64_t budget = o_.kv_cache_memory_bytes;
      if (budget > 0 && avail > 0 && budget > avail) {
        return absl::ResourceExhaustedError(absl::StrCat("--kv-cache-memory ", budget, " exceeds the ",
                                                         avail, " bytes of available memory"));
      }
      if (budget <= 0) budget = avail > 0 ? std::min(kDefaultKvCacheMemory, avail / 2) : kDefaultKvCacheMemory;
      ASSIGN_OR_RETURN(const int64_t blocks, PlanKvPool(budget, shape));
      max_gpu_blocks_ = static_cast<int32_t>(std::min<int64_t>(blocks, INT32_MAX));
    }
    if (max_gpu_blocks_ < 1) {
      return absl::ResourceExhaustedError(absl::StrCat("the KV budget holds no block of ", per_block, " bytes"));
    }
    RETURN_IF_ERROR(ComputeSwapBlocks(shape));
    ConfigToProto(c, ready->mutable_config());
    ready->set_kv_bytes_per_block(per_block);
    ready->set_max_gpu_blocks(max_gpu_blocks_);
    ready->set_max_cpu_blocks(max_cpu_blocks_);
    ready->set_weight_bytes(WeightBytes(*weights_));
    ready->set_shard_num_heads(dims.num_heads);
    ready->set_shard_num_kv_heads(dims.num_kv_heads);
    spdlog::info("rank {}/{}: shard loaded in {} ms ({} heads, {} kv heads, {:.1f} MiB weights); "
                 "KV fits {} blocks of {} bytes, {} swap blocks",
                 o_.rank, o_.world_size, MicrosSince(t0) / 1000, dims.num_heads, dims.num_kv_heads,
                 WeightBytes(*weights_) / 1048576.0, max_gpu_blocks_, per_block, max_cpu_blocks_);
    return absl::OkStatus();
  }

#if STRATA_HAVE_CUDA
  // Init for --device cuda: the shard's weights go to the GPU now (the host
  // copy is dropped), the arena is carved, and what fits of the rest becomes
  // max_gpu_blocks; the pools are allocated on Allocate.
  absl::Status InitCuda(const v1::Init& init, const ShardSpec& spec,
                        std::chrono::steady_clock::time_point t0, v1::Ready* ready) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
      return absl::FailedPreconditionError("--device cuda: no CUDA device is visible to this worker");
    }
    const int dev = o_.cuda_device >= 0 ? o_.cuda_device : o_.rank % count;
    if (dev >= count) {
      return absl::InvalidArgumentError(absl::StrCat("--cuda-device ", dev, ": only ", count, " device(s) visible"));
    }
    CudaEngineOptions co;
    co.engine.kv_format = format_;
    co.engine.block_size = block_size_;
    co.engine.num_gpu_blocks = o_.num_kv_blocks > 0 ? o_.num_kv_blocks : 0;
    co.device = dev;
    if (init.dtype() == "bf16") {
      co.dtype = WeightDtype::kBf16;
    } else if (init.dtype().empty() || init.dtype() == "fp16" || init.dtype() == "auto") {
      co.dtype = WeightDtype::kFp16;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--dtype '", init.dtype(), "': the CUDA engine runs fp16 or bf16"));
    }
    if (init.gpu_memory_utilization() > 0) co.gpu_memory_utilization = init.gpu_memory_utilization();
    if (init.max_num_seqs() > 0) {
      co.max_num_seqs = init.max_num_seqs();
      co.max_logit_rows = std::max(co.max_logit_rows, init.max_num_seqs());
    }
    if (init.max_num_tokens() > 0) co.max_num_tokens = init.max_num_tokens();
    co.max_num_tokens = std::max(co.max_num_tokens, co.max_num_seqs);
    if (init.enforce_eager()) co.graph_batch_sizes.clear();
    co.overlap_mixed_attention = !init.serialize_mixed_attention();
    co.shard = spec;
    co.compute_logits = o_.rank == 0;
    co.defer_kv_allocation = true;
    std::unique_ptr<CudaEngine> e;
    if (init.load_format() == "dummy") {
      ASSIGN_OR_RETURN(ModelConfig c, NamedModelShape(init.dummy_shape()));
      ASSIGN_OR_RETURN(e, CudaEngine::CreateDummy(c, co, init.dummy_seed() + 1, quant_params_));
    } else if (init.load_format() == "auto" || init.load_format().empty()) {
      ASSIGN_OR_RETURN(ModelWeights w, LoadShardWeights(init.model_path(), spec));
      ASSIGN_OR_RETURN(e, CudaEngine::Create(w, co, quant_params_));
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown load format '", init.load_format(), "'"));
    }
    const ModelConfig& c = e->config();
    const CudaMemoryReport& m = e->memory();
    max_gpu_blocks_ = e->max_gpu_blocks();
    const KvCacheShape shape{format_, block_size_, e->shard_config().num_kv_heads, c.head_dim, c.num_layers};
    RETURN_IF_ERROR(ComputeSwapBlocks(shape));
    ConfigToProto(c, ready->mutable_config());
    ready->set_kv_bytes_per_block(e->kv_bytes_per_block());
    ready->set_max_gpu_blocks(max_gpu_blocks_);
    ready->set_max_cpu_blocks(max_cpu_blocks_);
    ready->set_weight_bytes(m.weights);
    ready->set_shard_num_heads(e->shard_config().num_heads);
    ready->set_shard_num_kv_heads(e->shard_config().num_kv_heads);
    cudaDeviceProp prop{};
    (void)cudaGetDeviceProperties(&prop, dev);
    device_name_ = absl::StrCat("cuda:", dev, " ", prop.name);
    spdlog::info("rank {}/{} on {}: weights {:.1f} MiB, arena {:.1f} MiB, {:.1f} GiB free -> {} KV blocks "
                 "of {} bytes fit; {} swap blocks; ready in {} ms",
                 o_.rank, o_.world_size, device_name_, m.weights / 1048576.0, m.arena / 1048576.0,
                 m.free_before_kv / 1073741824.0, max_gpu_blocks_, e->kv_bytes_per_block(), max_cpu_blocks_,
                 MicrosSince(t0) / 1000);
    cuda_ = e.get();
    engine_ = std::move(e);
    return absl::OkStatus();
  }

  absl::Status AllocateCuda(const v1::Allocate& a, v1::MemoryReport* mem) {
    if (o_.world_size > 1) {
      CollectivesOptions co = JoinRendezvous();
      co.cuda_device = cuda_->cuda_options().device;
      co.cuda_stream = cuda_->stream();
      ASSIGN_OR_RETURN(collectives_, CreateNcclCollectives(co, store_.get()));
      cuda_->set_collectives(collectives_.get());
    }
    RETURN_IF_ERROR(cuda_->AllocateKv(a.num_gpu_blocks(), a.num_cpu_blocks()));
    const CudaMemoryReport& m = cuda_->memory();
    mem->set_device(device_name_);
    mem->set_total(m.total);
    mem->set_weights(m.weights);
    mem->set_activations(m.arena);
    mem->set_kv_cache(m.kv);
    mem->set_swap(m.host_swap);
    mem->set_free(m.free_after_kv);
    allocated_ = true;
    spdlog::info("rank {}/{}: {} KV blocks ({:.2f} GiB) + {} swap blocks allocated on {}; {:.2f} GiB free",
                 o_.rank, o_.world_size, a.num_gpu_blocks(), m.kv / 1073741824.0, a.num_cpu_blocks(),
                 device_name_, m.free_after_kv / 1073741824.0);
    return absl::OkStatus();
  }
#else
  absl::Status InitCuda(const v1::Init&, const ShardSpec&, std::chrono::steady_clock::time_point,
                        v1::Ready*) {
    return absl::UnimplementedError("--device cuda: this strata-worker was built without CUDA");
  }
  absl::Status AllocateCuda(const v1::Allocate&, v1::MemoryReport*) {
    return absl::UnimplementedError("--device cuda: this strata-worker was built without CUDA");
  }
#endif

  // The rendezvous store (the scheduler's control plane) and the options every
  // collectives backend shares.
  CollectivesOptions JoinRendezvous() {
    store_ = std::make_unique<GrpcKvStore>(channel_, o_.secret);
    CollectivesOptions co;
    co.rank = o_.rank;
    co.world_size = o_.world_size;
    co.key_prefix = rendezvous_prefix_;
    co.timeout = collective_timeout_;
    return co;
  }

  absl::Status ComputeSwapBlocks(const KvCacheShape& shape) {
    if (o_.num_swap_blocks >= 0) {
      max_cpu_blocks_ = o_.num_swap_blocks;
    } else {
      ASSIGN_OR_RETURN(const int64_t bytes, SwapSpaceBytes(o_.swap_space_gib));
      ASSIGN_OR_RETURN(const int64_t blocks, PlanKvPool(bytes, shape));
      max_cpu_blocks_ = static_cast<int32_t>(std::min<int64_t>(blocks, INT32_MAX));
    }
    return absl::OkStatus();
  }

  absl::Status HandleAllocate(const v1::Allocate& a, v1::MemoryReport* mem) {
    const bool initialized = device_ == "cuda" ? engine_ != nullptr && !allocated_ : weights_.has_value() && engine_ == nullptr;
    if (!initialized) {
      return absl::FailedPreconditionError("Allocate must follow one successful Init");
    }
    if (a.num_gpu_blocks() < 1 || a.num_gpu_blocks() > max_gpu_blocks_ || a.num_cpu_blocks() < 0 ||
        a.num_cpu_blocks() > max_cpu_blocks_) {
      return absl::InvalidArgumentError(absl::StrCat("Allocate ", a.num_gpu_blocks(), "/", a.num_cpu_blocks(),
                                                     " blocks exceeds this rank's ", max_gpu_blocks_, "/",
                                                     max_cpu_blocks_));
    }
    if (device_ == "cuda") return AllocateCuda(a, mem);
    if (o_.world_size > 1) {
      CollectivesOptions co = JoinRendezvous();
      co.gloo_hostname = o_.gloo_hostname;
      ASSIGN_OR_RETURN(collectives_, CreateGlooCollectives(co, store_.get()));
    }
    EngineOptions eo;
    eo.kv_format = format_;
    eo.block_size = block_size_;
    eo.num_gpu_blocks = a.num_gpu_blocks();
    eo.num_cpu_blocks = a.num_cpu_blocks();
    CpuShardOptions so;
    so.shard = {o_.rank, o_.world_size};
    so.collectives = collectives_.get();
    so.compute_logits = o_.rank == 0;
    ModelWeights w = std::move(*weights_);
    weights_.reset();
    ASSIGN_OR_RETURN(std::unique_ptr<CpuEngine> cpu, CpuEngine::Create(std::move(w), eo, quant_params_, so));
    const int64_t per_layer_block = cpu->kv_bytes_per_block();
    engine_ = std::move(cpu);
    allocated_ = true;
    mem->set_device("cpu");
    mem->set_kv_cache(per_layer_block * eo.num_gpu_blocks);
    mem->set_swap(per_layer_block * eo.num_cpu_blocks);
    spdlog::info("rank {}/{}: {} KV blocks + {} swap blocks allocated", o_.rank, o_.world_size,
                 eo.num_gpu_blocks, eo.num_cpu_blocks);
    return absl::OkStatus();
  }

  absl::Status HandleStep(const v1::Step& p, v1::StepResult* r) {
    if (!allocated_) return absl::FailedPreconditionError("Step before Allocate");
    if (o_.fault_slow_first_step > absl::ZeroDuration()) {
      absl::SleepFor(std::exchange(o_.fault_slow_first_step, absl::ZeroDuration()));
    }
    RETURN_IF_ERROR(StepFromProto(p, &in_));
    if (engine_->SupportsSampling()) {  // samples on the device: only tokens come back
      const auto t0 = std::chrono::steady_clock::now();
      RETURN_IF_ERROR(engine_->Step(in_, &out_));
      r->set_engine_us(MicrosSince(t0));
      if (o_.rank == 0) OutputToProto(out_, r);
      return absl::OkStatus();
    }
    // Sampling needs the last row even when the caller wants no logits back.
    bool filtered = false;
    wanted_.resize(in_.seqs.size());
    for (size_t i = 0; i < in_.seqs.size(); ++i) {
      SeqStepInput& s = in_.seqs[i];
      wanted_[i] = s.logits;
      if (s.sample && s.logits == SeqStepInput::Logits::kNone) s.logits = SeqStepInput::Logits::kLast, filtered = true;
      if (s.sample) RETURN_IF_ERROR(ValidateSamplingParams(s.sampling, engine_->config().vocab_size));
    }
    const auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(engine_->Step(in_, &out_));
    r->set_engine_us(MicrosSince(t0));
    if (o_.rank != 0) return absl::OkStatus();
    const int32_t vocab = engine_->config().vocab_size;
    out_.sampled.clear();
    bool any_sample = false;
    for (const SeqStepInput& s : in_.seqs) any_sample |= s.sample;
    if (any_sample) {
      out_.sampled.resize(in_.seqs.size());
      for (size_t i = 0; i < in_.seqs.size(); ++i) {
        const SeqStepInput& s = in_.seqs[i];
        if (!s.sample) continue;
        const float* row = out_.logits.data() + int64_t{out_.row_begin[i + 1] - 1} * vocab;
        SamplingParams sp = s.sampling;
        // Keyed by (seed, position of the sampled row): independent of the batch.
        const uint64_t pos = static_cast<uint64_t>(s.start_pos) + s.tokens.size() - 1;
        sp.seed = SeedForPosition(s.sampling.seed, pos);
        Sampler sampler(sp);
        StepOutput::Sampled& o = out_.sampled[i];
        o.token = sampler.Sample(row, vocab);
        if (s.num_logprobs >= 0) {
          o.logprob = LogProbOf(row, vocab, o.token);
          if (s.num_logprobs > 0) o.top_logprobs = TopLogProbs(row, vocab, s.num_logprobs);
        }
      }
    }
    if (filtered) {
      // Drop the rows that were computed only for sampling.
      StepOutput kept;
      kept.row_begin.assign(in_.seqs.size() + 1, 0);
      for (size_t i = 0; i < in_.seqs.size(); ++i) {
        const int32_t b = out_.row_begin[i], e = out_.row_begin[i + 1];
        if (wanted_[i] != SeqStepInput::Logits::kNone) {
          kept.logits.insert(kept.logits.end(), out_.logits.begin() + int64_t{b} * vocab,
                             out_.logits.begin() + int64_t{e} * vocab);
        }
        kept.row_begin[i + 1] = kept.row_begin[i] + (wanted_[i] != SeqStepInput::Logits::kNone ? e - b : 0);
      }
      kept.sampled = std::move(out_.sampled);
      OutputToProto(kept, r);
    } else {
      OutputToProto(out_, r);
    }
    return absl::OkStatus();
  }

  WorkerOptions o_;
  std::shared_ptr<grpc::Channel> channel_;
  // Between Init and Allocate.
  std::optional<ModelWeights> weights_;
  std::optional<KvQuantParams> quant_params_;
  KvFormat format_;
  int32_t block_size_ = 16;
  int32_t max_gpu_blocks_ = 0, max_cpu_blocks_ = 0;
  std::string rendezvous_prefix_;
  absl::Duration collective_timeout_ = absl::Seconds(60);
  // After Allocate.
  std::unique_ptr<GrpcKvStore> store_;
  std::unique_ptr<Collectives> collectives_;
  std::unique_ptr<Engine> engine_;  // CPU: created on Allocate; CUDA: on Init
  bool allocated_ = false;
  std::string device_ = "cpu";
  std::string device_name_;
#if STRATA_HAVE_CUDA
  CudaEngine* cuda_ = nullptr;  // engine_, when --device cuda
#endif
  // Reused across steps.
  StepInput in_;
  StepOutput out_;
  std::vector<SeqStepInput::Logits> wanted_;
};

WorkerSession::WorkerSession(WorkerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
WorkerSession::~WorkerSession() = default;
absl::Status WorkerSession::Run() { return impl_->Run(); }

}  // namespace strata
