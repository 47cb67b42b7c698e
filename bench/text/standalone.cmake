# Adds the text_bench target to a build whose bench/CMakeLists.txt does not include bench/text
# (yet):  cmake -DCMAKE_PROJECT_INCLUDE=<repo>/bench/text/standalone.cmake ...
# (encode_speed.sh does this by itself when text_bench is missing). Harmless once it is included.
function(arbiter_add_text_bench)
  if(NOT TARGET text_bench)
    add_executable(text_bench ${PROJECT_SOURCE_DIR}/bench/text/text_bench.cc)
    target_compile_options(text_bench PRIVATE ${ARBITER_WARNINGS})
    target_compile_definitions(text_bench PRIVATE ARBITER_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
    target_link_libraries(text_bench PRIVATE arbiter_runtime)
    set_target_properties(text_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bench/text)
  endif()
endfunction()
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL arbiter_add_text_bench)
