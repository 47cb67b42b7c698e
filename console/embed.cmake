# Turns the web console's files (console/*) into a C++ source file holding their bytes, so that
# `arbiter serve` carries the console inside its binary: no install step, nothing read from disk at
# run time. Run at build time by api/CMakeLists.txt:
#   cmake -DOUT=console_assets.cc -DFILES=a,b,c -P console/embed.cmake
if(NOT OUT OR NOT FILES)
  message(FATAL_ERROR "embed.cmake needs -DOUT=<file.cc> and -DFILES=<files separated by commas>")
endif()
string(REPLACE "," ";" FILES "${FILES}")
set(code "// Generated at build time by console/embed.cmake from console/: the web console's files as bytes.\n")
string(APPEND code "// Do not edit; edit the files in console/ instead.\n#include \"api/console.h\"\n\nnamespace arbiter::api {\nnamespace {\n")
set(table "")
set(index 0)
foreach(file IN LISTS FILES)
  get_filename_component(name "${file}" NAME)
  file(READ "${file}" hex HEX)
  string(LENGTH "${hex}" hex_length)
  math(EXPR size "${hex_length} / 2")
  # Sixteen bytes a line: "0x3c,0x21,...".
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
  string(REPEAT "0x[0-9a-f][0-9a-f]," 16 sixteen)
  string(REGEX REPLACE "(${sixteen})" "\\1\n  " bytes "${bytes}")
  string(APPEND code "const unsigned char kFile${index}[] = {\n  ${bytes}0x00};\n")
  string(APPEND table "    {\"${name}\", kFile${index}, ${size}},\n")
  math(EXPR index "${index} + 1")
endforeach()
string(APPEND code "}  // namespace\n\nconst ConsoleFile kConsoleFiles[] = {\n${table}};\nconst size_t kConsoleFileCount = ${index};\n\n}  // namespace arbiter::api\n")
file(WRITE "${OUT}" "${code}")
