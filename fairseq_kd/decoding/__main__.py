"""``python -m fairseq_kd.decoding {decode,merge,binarize} ...``"""

from fairseq_kd.decoding.cli import main

main()
