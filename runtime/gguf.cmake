# GGUF model files and byte-level BPE vocabularies (included at the end of
# runtime/CMakeLists.txt). The GGUF reader is part of strata_model_io (weights
# dispatch on .gguf); the byte-level BPE is part of strata_tokenizer, which
# reads GGUF vocabularies through strata_model_io.
target_sources(strata_model_io PRIVATE ${CMAKE_CURRENT_LIST_DIR}/gguf.cc)
target_sources(strata_tokenizer PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bpe_tokenizer.cc
               ${CMAKE_CURRENT_LIST_DIR}/bpe_unicode.cc)
target_link_libraries(strata_tokenizer PUBLIC strata_model_io)

strata_cc_test(runtime_gguf_test SRCS ${CMAKE_CURRENT_LIST_DIR}/gguf_test.cc DEPS strata_model_io)
strata_cc_test(runtime_bpe_tokenizer_test SRCS ${CMAKE_CURRENT_LIST_DIR}/bpe_tokenizer_test.cc
               DEPS strata_tokenizer nlohmann_json::nlohmann_json)
